//! Keys: verification of a key a core doesn't know, generation with a new organization, rotation,
//! and the key's description. Every statement finds organizations by primary key or `key_id`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::ctx::{Done, Failure, StoreCtx};
use super::org::change_org;
use crate::auth::flight::Flight;
use crate::auth::verify::{Remembered, SlotsBusy};
use crate::auth::{ApiKey, AuthFailure, KeyHash, OrgInfo, Tier};
use crate::config::KEY_ID_COLLISION_TRIES;
use crate::flow::answer::{Answer, KeyInfo, NewKey, Refusal};
use crate::flow::job::GenerateOnce;
use crate::ids::{new_v7, Micros, OrgId};

/// Look the key id up, check the secret with Argon2 off any connection, throttle failures. One
/// verification per key at a time on this node; the others wait for its answer. A key this node
/// verified before whose organization may have changed since (a rotation, a webhook change, or
/// every cache flushed while LISTEN was down) is checked against the row without Argon2: if the
/// row still holds the hash the key matched, it is still the organization's key.
pub async fn verify(ctx: &StoreCtx, key: ApiKey, peer: IpAddr) -> Result<OrgInfo, Refusal> {
    let hash = ctx.verifier.hash_key(&key);
    if let Remembered::Fresh(org) = ctx.verifier.cached(hash) {
        return Ok(org);
    }
    match ctx.flights.join(hash) {
        Flight::Leader(leader) => {
            let answer = verify_uncached(ctx, &key, peer, hash).await;
            leader.land(&answer);
            answer
        }
        Flight::Follower(rx) => match rx.await {
            Ok(Ok(org)) => Ok(org),
            Ok(Err(r @ Refusal::Unauthorized(_))) => {
                ctx.verifier.record_failure(peer);
                Err(r)
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
    hash: KeyHash,
) -> Result<OrgInfo, Refusal> {
    if let Some(retry_after_s) = ctx.verifier.throttled(peer) {
        return Err(AuthFailure::Throttled { retry_after_s }.into());
    }
    let known = ctx.verifier.cached(hash);
    let epoch = ctx.verifier.epoch();
    let key_id = key.key_id().to_string();
    let row = ctx
        .timed_read("auth lookup", || async {
            let client = ctx.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, rate_limit_per_minute, key_hash, key_prefix \
                     FROM organizations WHERE key_id = $1",
                )
                .await?;
            Ok(client.query_opt(&stmt, &[&key_id]).await?)
        })
        .await?;
    let refuse = || {
        ctx.verifier.record_failure(peer);
        Err(AuthFailure::Refused.into())
    };
    // An unknown key id costs an index lookup, never Argon2.
    let Some(row) = row else { return refuse() };
    let prefix: String = row.get(3);
    if prefix != key.prefix() {
        return refuse();
    }
    let phc: String = row.get(2);
    let same_hash = matches!(&known, Remembered::Stale { phc: old } if *old == phc);
    if !same_hash {
        match ctx
            .verifier
            .check(key.secret().to_string(), phc.clone())
            .await
        {
            Ok(true) => {}
            Ok(false) => return refuse(),
            Err(SlotsBusy) => return Err(Refusal::Overloaded("key verification busy")),
        }
    }
    let limit: i32 = row.get(1);
    let org = OrgInfo {
        id: OrgId(row.get(0)),
        limit: limit.max(1) as u32,
    };
    ctx.verifier.remember(hash, org, &phc, epoch);
    Ok(org)
}

/// A fresh key and its hash; the hash runs on a blocking thread in the key-creation slots. Key
/// creations are limited per client address and per node before any hashing.
async fn new_key(ctx: &StoreCtx, peer: IpAddr) -> Result<(ApiKey, String), Refusal> {
    ctx.key_ops
        .take(peer)
        .map_err(|retry_after_s| Refusal::KeyOpsLimited { retry_after_s })?;
    let key = ApiKey::generate().map_err(|e| {
        tracing::error!(error = %e, "OS random source failed");
        Refusal::Internal
    })?;
    let hash = match ctx.verifier.hash(key.secret().to_string()).await {
        Ok(Ok(hash)) => hash,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "hashing a key failed");
            return Err(Refusal::Internal);
        }
        Err(SlotsBusy) => return Err(Refusal::Overloaded("key creation busy")),
    };
    Ok((key, hash))
}

fn is_unique_violation(f: &Failure) -> bool {
    matches!(f, Failure::Db(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

/// `POST /api/keys/generate`: a new organization and its key. With `once` (sent with an
/// `Idempotency-Key`) the organization keeps the request's digests for `--key-rotation-retry-s`:
/// the same request again in that time (its answer lost) gets it with a new key (`regenerate`),
/// the same Idempotency-Key with another body is refused, and after that time the
/// Idempotency-Key is free again.
pub async fn generate(
    ctx: &StoreCtx,
    name: String,
    tier: Tier,
    peer: IpAddr,
    once: Option<GenerateOnce>,
) -> Result<Answer, Refusal> {
    let once = once.filter(|_| ctx.config.key_rotation_retry_s > 0);
    // A key-id collision (one in 62^16) just means trying another key; an Idempotency-Key taken
    // meanwhile by the same request sent twice at once, that the next turn finds.
    for _ in 0..KEY_ID_COLLISION_TRIES {
        if let Some(once) = &once {
            if let Some(answer) = generated_before(ctx, once, peer).await? {
                return Ok(answer);
            }
        }
        let (key, hash) = new_key(ctx, peer).await?;
        let now = Micros::now();
        let id = new_v7(now);
        let epoch = ctx.verifier.epoch();
        let limit = tier.limit_per_minute() as i32;
        let retry_until = once.map(|_| {
            now.plus(Duration::from_secs(ctx.config.key_rotation_retry_s))
                .to_system_time()
        });
        let insert = async {
            let client = ctx.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO organizations \
                     (id, name, tier, rate_limit_per_minute, key_id, key_hash, key_prefix, created_at, \
                      creation_idempotency, creation_body, creation_retry_until) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
                        &once.as_ref().map(|o| &o.key_sha256[..]),
                        &once.as_ref().map(|o| &o.body_sha256[..]),
                        &retry_until,
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
                };
                ctx.verifier
                    .remember(ctx.verifier.hash_key(&key), org, &hash, epoch);
                return Ok(Answer::Generated(NewKey {
                    api_key: key.as_str().to_string(),
                    organization_id: id,
                    organization_name: name,
                    tier: Some(tier),
                    at: now,
                }));
            }
            Ok(Err(f)) if is_unique_violation(&f) => continue,
            Ok(Err(f)) => return Err(ctx.fail("generate key", f)),
            Err(_) => return Err(Refusal::Unavailable),
        }
    }
    Err(Refusal::Internal)
}

/// A generation's `Idempotency-Key` seen before: within its time and with the same body, the
/// answer (that organization, a new key); with another body, the refusal; its time passed, the
/// Idempotency-Key let go and `None` (a new organization is made); never seen, `None`.
async fn generated_before(
    ctx: &StoreCtx,
    once: &GenerateOnce,
    peer: IpAddr,
) -> Result<Option<Answer>, Refusal> {
    let row = ctx
        .timed("find a generation", async {
            let client = ctx.pool.get().await?;
            Ok(client
                .query_opt(
                    "SELECT id, creation_body, creation_retry_until > now() FROM organizations \
                     WHERE creation_idempotency = $1",
                    &[&&once.key_sha256[..]],
                )
                .await?)
        })
        .await?;
    let Some(row) = row else { return Ok(None) };
    let org = OrgId(row.get(0));
    let body: Vec<u8> = row.get(1);
    if !row.get::<_, bool>(2) {
        ctx.timed("let an Idempotency-Key go", async {
            let client = ctx.pool.get().await?;
            client
                .execute(
                    "UPDATE organizations SET creation_idempotency = NULL, creation_body = NULL, \
                     creation_retry_until = NULL WHERE id = $1 AND creation_idempotency = $2",
                    &[&org.0, &&once.key_sha256[..]],
                )
                .await?;
            Ok(())
        })
        .await?;
        return Ok(None);
    }
    if body != once.body_sha256 {
        return Err(Refusal::Invalid {
            field: "Idempotency-Key",
            message: "this Idempotency-Key was sent before with another body; a new request \
                      needs a new key"
                .into(),
        });
    }
    match regenerate(ctx, org, once, peer).await {
        Err(Refusal::NotFound(_)) => Ok(None),
        other => other.map(Some),
    }
}

/// A generation asked again within its time (`--key-rotation-retry-s`), its answer lost: the
/// organization the first made, with a new key. The key of the lost answer is refused from
/// this answer on, on every node, as after a rotation; the time is not extended.
async fn regenerate(
    ctx: &StoreCtx,
    org: OrgId,
    once: &GenerateOnce,
    peer: IpAddr,
) -> Result<Answer, Refusal> {
    let (key, hash) = new_key(ctx, peer).await?;
    let row = change_org(
        ctx,
        org,
        "generate key again",
        "UPDATE organizations SET key_id = $2, key_hash = $3, key_prefix = $4 \
         WHERE id = $1 AND creation_idempotency = $5 AND creation_retry_until > now() \
         RETURNING name, tier, created_at",
        &[
            &org.0,
            &key.key_id(),
            &hash,
            &key.prefix(),
            &&once.key_sha256[..],
        ],
    )
    .await?;
    let tier: String = row.get(1);
    Ok(Answer::Generated(NewKey {
        api_key: key.as_str().to_string(),
        organization_id: org.0,
        organization_name: row.get(0),
        tier: Some(Tier::parse(&tier).ok_or(Refusal::Internal)?),
        at: Micros::from_system_time(row.get(2)),
    }))
}

/// `GET /api/keys`.
pub async fn key_info(ctx: &StoreCtx, org: OrgId) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT o.name, o.tier, o.rate_limit_per_minute, \
                    (SELECT p.url FROM endpoints p \
                     WHERE p.org_id = o.id AND p.is_default AND p.status IN (0, 1)), \
                    o.key_prefix, o.created_at, o.rotated_at \
             FROM organizations o WHERE o.id = $1",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&org.0])
        .await?
        .ok_or(Refusal::NotFound("organization not found"))?;
    Ok(Answer::KeyInfo(KeyInfo {
        organization_id: org.0,
        organization_name: row.get(0),
        tier: row.get(1),
        rate_limit_per_minute: row.get(2),
        webhook_url: row.get(3),
        key_prefix: row.get(4),
        created_at: Micros::from_system_time(row.get(5)),
        rotated_at: row
            .get::<_, Option<SystemTime>>(6)
            .map(Micros::from_system_time),
    }))
}

/// `POST /api/keys/rotate`: the old key is refused on every core of this node before this
/// answers, and on the others when they hear the NOTIFY. With `retry_key` (the SHA-256 of the
/// request's `Idempotency-Key`) the retired key is kept, for [`retry_rotation`] alone, until
/// `--key-rotation-retry-s` from now; without it no retired key is kept.
pub async fn rotate(
    ctx: &StoreCtx,
    org: OrgId,
    peer: IpAddr,
    retry_key: Option<[u8; 32]>,
) -> Result<Answer, Refusal> {
    let (key, hash) = new_key(ctx, peer).await?;
    let now = Micros::now();
    let retry_key = retry_key.filter(|_| ctx.config.key_rotation_retry_s > 0);
    let retry_until = retry_key.map(|_| {
        now.plus(Duration::from_secs(ctx.config.key_rotation_retry_s))
            .to_system_time()
    });
    let retry_key = retry_key.as_ref().map(|k| &k[..]);
    // Every expression reads the row as it was: the retired key is the one replaced here.
    let row = change_org(
        ctx,
        org,
        "rotate key",
        "UPDATE organizations SET \
             previous_key_id = CASE WHEN $6::bytea IS NULL THEN NULL ELSE key_id END, \
             previous_key_prefix = CASE WHEN $6::bytea IS NULL THEN NULL ELSE key_prefix END, \
             previous_key_hash = CASE WHEN $6::bytea IS NULL THEN NULL ELSE key_hash END, \
             rotation_idempotency = $6, rotation_retry_until = $7, \
             key_id = $2, key_hash = $3, key_prefix = $4, rotated_at = $5 \
         WHERE id = $1 RETURNING name",
        &[
            &org.0,
            &key.key_id(),
            &hash,
            &key.prefix(),
            &now.to_system_time(),
            &retry_key,
            &retry_until,
        ],
    )
    .await?;
    Ok(rotated(org, row.get(0), &key, now))
}

/// `POST /api/keys/rotate` asked again with the key a rotation retired and that rotation's
/// `Idempotency-Key`, within `--key-rotation-retry-s` of it: its answer was lost, so the
/// organization has no key it knows. It rotates again from the retired key: the key of the lost
/// answer is retired too, the retry's window is not extended, and the retired key is still
/// refused everywhere else. Anything that does not match (no such retired key, another
/// Idempotency-Key, the window passed, a wrong secret) is a 401 counted against the address,
/// as any refused key is, and costs no Argon2 unless the key id, prefix and Idempotency-Key
/// all match.
pub async fn retry_rotation(
    ctx: &StoreCtx,
    key: ApiKey,
    retry_key: [u8; 32],
    peer: IpAddr,
) -> Result<Answer, Refusal> {
    if let Some(retry_after_s) = ctx.verifier.throttled(peer) {
        return Err(AuthFailure::Throttled { retry_after_s }.into());
    }
    let key_id = key.key_id().to_string();
    let row = ctx
        .timed("find a retired key", async {
            let client = ctx.pool.get().await?;
            Ok(client
                .query_opt(
                    "SELECT id, previous_key_prefix, previous_key_hash FROM organizations \
                     WHERE previous_key_id = $1 AND rotation_idempotency = $2 \
                       AND rotation_retry_until > now()",
                    &[&key_id, &&retry_key[..]],
                )
                .await?)
        })
        .await?;
    let refuse = || {
        ctx.verifier.record_failure(peer);
        Err(AuthFailure::Refused.into())
    };
    let Some(row) = row else { return refuse() };
    let prefix: Option<String> = row.get(1);
    let phc: Option<String> = row.get(2);
    let (Some(prefix), Some(phc)) = (prefix, phc) else {
        return refuse();
    };
    if prefix != key.prefix() {
        return refuse();
    }
    match ctx.verifier.check(key.secret().to_string(), phc).await {
        Ok(true) => {}
        Ok(false) => return refuse(),
        Err(SlotsBusy) => return Err(Refusal::Overloaded("key verification busy")),
    }
    let org = OrgId(row.get(0));
    let (new, hash) = new_key(ctx, peer).await?;
    let now = Micros::now();
    // Only while the retired key and the window are still those checked (a rotation made since
    // by the organization's current key ends the retry).
    let changed = change_org(
        ctx,
        org,
        "rotate key again",
        "UPDATE organizations SET key_id = $2, key_hash = $3, key_prefix = $4, rotated_at = $5 \
         WHERE id = $1 AND previous_key_id = $6 AND rotation_idempotency = $7 \
           AND rotation_retry_until > now() \
         RETURNING name",
        &[
            &org.0,
            &new.key_id(),
            &hash,
            &new.prefix(),
            &now.to_system_time(),
            &key_id,
            &&retry_key[..],
        ],
    )
    .await;
    let row = match changed {
        Ok(row) => row,
        Err(Refusal::NotFound(_)) => return refuse(),
        Err(other) => return Err(other),
    };
    Ok(rotated(org, row.get(0), &new, now))
}

/// A rotation's answer: the new key, shown once.
fn rotated(org: OrgId, name: String, key: &ApiKey, at: Micros) -> Answer {
    Answer::Rotated(NewKey {
        api_key: key.as_str().to_string(),
        organization_id: org.0,
        organization_name: name,
        tier: None,
        at,
    })
}
