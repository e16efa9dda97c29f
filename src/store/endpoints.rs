//! `/api/endpoints…`: an organization's endpoints, their secrets, pause and resume, and the
//! recovery of failed deliveries. Every change is one transaction with a NOTIFY, so every node's
//! delivery pool drops what it cached of the organization's endpoints (as for a key change).
//!
//! A deleted endpoint is kept with status `removed` (3): the history of its deliveries keeps
//! its id, and a deleted default endpoint keeps the organization's v1 signing secret for the
//! next `POST /api/webhook/config`.

use std::time::{Duration, SystemTime};

use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::ctx::{begin, Done, StoreCtx};
use super::org::notify;
use crate::config::SIGNING_SECRET_BYTES;
use crate::flow::answer::{
    Answer, AttemptView, Circuit, EndpointHealth, EndpointStatus, EndpointView, FailedDelivery,
    FailedPage, Refusal,
};
use crate::flow::event::EventStatus;
use crate::flow::job::{EndpointPatch, EndpointSpec, Once};
use crate::flow::Change;
use crate::hosts::Use;
use crate::ids::{new_v7, Micros, OrgId};
use crate::url_policy::Unresolved;
use crate::{endpoint_headers, signing_secret, url_policy};

/// The columns [`endpoint_view`] reads, in its order.
pub const ENDPOINT_COLUMNS: &str = "id, url, event_types, description, rate_limit_per_second, \
     status, consecutive_failures, last_success_at, last_failure_at, circuit_open_until, \
     created_at, updated_at, headers";

/// `whsec_` and the standard base64 of random bytes.
pub fn new_signing_secret() -> Result<String, Refusal> {
    let mut bytes = [0u8; SIGNING_SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|_| Refusal::Internal)?;
    Ok(signing_secret::encode(&bytes))
}

/// Resolve a URL's host and apply the SSRF policy (its shape was checked by ingress).
/// The lookup is one of `org`'s ([`crate::config::LOOKUPS_PER_ORG_MAX`] at once).
pub async fn check_url(
    ctx: &StoreCtx,
    org: OrgId,
    url: &str,
    field: &'static str,
) -> Result<(), Refusal> {
    let invalid = |message: String| Refusal::Invalid { field, message };
    let parsed = url_policy::parse_url(url).map_err(invalid)?;
    let checked = ctx
        .hosts
        .resolve(
            &parsed,
            ctx.config.allow_private_webhooks,
            Use::Configure(org),
        )
        .await;
    match checked {
        Ok(_) => Ok(()),
        Err(Unresolved::Refused(message)) => Err(invalid(message)),
        Err(Unresolved::ResolverDown(message)) => {
            tracing::warn!(%message, "webhook host lookup failed");
            Err(Refusal::ResolverDown)
        }
    }
}

fn time(row: &Row, i: usize) -> Option<Micros> {
    row.get::<_, Option<SystemTime>>(i)
        .map(Micros::from_system_time)
}

/// An endpoint row (read with [`ENDPOINT_COLUMNS`]) as the API shows it. The circuit is as
/// last recorded: open until `circuit_open_until`, then half-open until an attempt succeeds.
pub fn endpoint_view(row: &Row, circuit_failures: usize) -> EndpointView {
    let failures: i32 = row.get(6);
    let open_until = time(row, 9);
    let circuit = match open_until {
        Some(t) if t > Micros::now() => Circuit::Open,
        _ if failures as usize >= circuit_failures => Circuit::HalfOpen,
        _ => Circuit::Closed,
    };
    EndpointView {
        id: row.get(0),
        url: row.get(1),
        event_types: row.get(2),
        description: row.get(3),
        rate_limit_per_second: row.get(4),
        headers: row.get(12),
        status: EndpointStatus::from_i16(row.get(5)),
        signing_secret: None,
        health: EndpointHealth {
            circuit,
            consecutive_failures: failures,
            last_success_at: time(row, 7),
            last_failure_at: time(row, 8),
        },
        created_at: Micros::from_system_time(row.get(10)),
        updated_at: Micros::from_system_time(row.get(11)),
    }
}

/// Lock the organization (endpoint creations take turns, so the limit holds) and refuse when it
/// has as many endpoints as it may.
pub async fn check_room(
    ctx: &StoreCtx,
    tx: &Transaction<'_>,
    org: OrgId,
    field: &'static str,
) -> Done<()> {
    tx.query_opt(
        "SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE",
        &[&org.0],
    )
    .await?
    .ok_or(Refusal::NotFound("organization not found"))?;
    let row = tx
        .query_one(
            "SELECT count(*) FROM endpoints WHERE org_id = $1 AND status <> $2",
            &[&org.0, &EndpointStatus::Removed.code()],
        )
        .await?;
    let max = ctx.config.endpoints_per_org_max;
    if row.get::<_, i64>(0) as usize >= max {
        return Err(Refusal::Invalid {
            field,
            message: format!("an organization may have at most {max} endpoints; delete one first"),
        }
        .into());
    }
    Ok(())
}

/// Run `work` in a transaction that ends with a NOTIFY of a change to the organization's
/// endpoints (again when PostgreSQL asks for it: a deadlock's victim), then drop what this
/// node's delivery pool cached of them.
macro_rules! org_change {
    ($ctx:expr, $org:expr, $what:expr, |$tx:ident| $body:block) => {{
        let out = $ctx
            .timed_reruns($what, || async {
                let mut client = $ctx.pool.get().await?;
                let $tx = begin(&mut client).await?;
                let out = $body;
                notify(&$tx, $org, Change::Endpoints).await?;
                $tx.commit().await?;
                Ok(out)
            })
            .await?;
        $ctx.endpoints_changed($org);
        out
    }};
}

/// The endpoint an organization's create with this `Idempotency-Key` made, if it still exists:
/// [`ENDPOINT_COLUMNS`], then its secret and the SHA-256 of that create's body.
async fn keyed<C: deadpool_postgres::GenericClient>(
    client: &C,
    org: OrgId,
    once: &Once,
) -> Done<Option<Row>> {
    Ok(client
        .query_opt(
            &format!(
                "SELECT {ENDPOINT_COLUMNS}, signing_secret, idempotency_body FROM endpoints \
                 WHERE org_id = $1 AND idempotency_key = $2 AND status <> $3"
            ),
            &[&org.0, &once.key, &EndpointStatus::Removed.code()],
        )
        .await?)
}

/// What a create's transaction found: the row it inserted, or the one an earlier create with
/// the same `Idempotency-Key` committed while it waited.
enum Made {
    New(Row),
    Earlier(Row, Once),
}

/// What answers a create whose key made `row` before: that endpoint as it is now, with its
/// secret, when the body is the same; else a refusal (the key names another request).
fn replay(row: &Row, once: &Once, circuit_failures: usize) -> Result<Answer, Refusal> {
    let body: Option<Vec<u8>> = row.get(14);
    if body.as_deref() != Some(&once.body_sha256[..]) {
        return Err(Refusal::Invalid {
            field: "Idempotency-Key",
            message: "this Idempotency-Key was sent before with another body; a new request \
                      needs a new key"
                .into(),
        });
    }
    let mut view = endpoint_view(row, circuit_failures);
    view.signing_secret = Some(row.get(13));
    Ok(Answer::EndpointReplayed(Box::new(view)))
}

/// `POST /api/endpoints`. With an `Idempotency-Key` (`once`), a create that repeats an earlier
/// one (its answer was lost: a timeout, a 503 after the commit) is answered with the endpoint
/// that one made, before its URL is resolved again; two at once with one key make one endpoint
/// (the unique index `endpoints_idempotency` decides, and the later is answered as a repeat).
pub async fn create(
    ctx: &StoreCtx,
    org: OrgId,
    spec: EndpointSpec,
    once: Option<Once>,
) -> Result<Answer, Refusal> {
    let failures = ctx.config.circuit_failures;
    if let Some(once) = &once {
        let earlier = ctx
            .timed("find an endpoint by idempotency key", async {
                let client = ctx.pool.get().await?;
                keyed(&client, org, once).await
            })
            .await?;
        if let Some(row) = earlier {
            return replay(&row, once, failures);
        }
    }
    check_url(ctx, org, &spec.url, "url").await?;
    let secret = match spec.signing_secret {
        Some(given) => given,
        None => new_signing_secret()?,
    };
    let now = Micros::now();
    let id = new_v7(now);
    let rate = spec.rate_limit_per_second.map(|r| r as i32);
    let (key, body) = match &once {
        Some(o) => (Some(o.key.as_str()), Some(&o.body_sha256[..])),
        None => (None, None),
    };
    let made = org_change!(ctx, org, "create endpoint", |tx| {
        check_room(ctx, &tx, org, "url").await?;
        let inserted = tx
            .query_opt(
                &format!(
                    "INSERT INTO endpoints (id, org_id, url, event_types, description, \
                         rate_limit_per_second, signing_secret, created_at, updated_at, headers, \
                         idempotency_key, idempotency_body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11) \
                     ON CONFLICT (org_id, idempotency_key) \
                         WHERE idempotency_key IS NOT NULL AND status <> {removed} DO NOTHING \
                     RETURNING {ENDPOINT_COLUMNS}",
                    removed = EndpointStatus::Removed.code()
                ),
                &[
                    &id,
                    &org.0,
                    &spec.url,
                    &spec.event_types,
                    &spec.description,
                    &rate,
                    &secret,
                    &now.to_system_time(),
                    &spec.headers,
                    &key,
                    &body,
                ],
            )
            .await?;
        match (inserted, &once) {
            (Some(row), _) => Made::New(row),
            // Another create with this key committed first (the insert waited for it).
            (None, Some(once)) => Made::Earlier(
                keyed(&tx, org, once).await?.ok_or(Refusal::Unavailable)?,
                once.clone(),
            ),
            // Without a key there is nothing to conflict on.
            (None, None) => return Err(Refusal::Internal.into()),
        }
    });
    match made {
        Made::New(row) => {
            let mut view = endpoint_view(&row, failures);
            view.signing_secret = Some(secret);
            Ok(Answer::Endpoint(Box::new(view)))
        }
        Made::Earlier(row, once) => replay(&row, &once, failures),
    }
}

/// `GET /api/endpoints`: every endpoint but the deleted ones, oldest first.
pub async fn list(ctx: &StoreCtx, org: OrgId) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE org_id = $1 AND status <> $2 \
             ORDER BY created_at, id"
        ))
        .await?;
    let rows = client
        .query(&stmt, &[&org.0, &EndpointStatus::Removed.code()])
        .await?;
    Ok(Answer::Endpoints(
        rows.iter()
            .map(|r| endpoint_view(r, ctx.config.circuit_failures))
            .collect(),
    ))
}

const NOT_FOUND: Refusal = Refusal::NotFound("endpoint not found");

/// `GET /api/endpoints/{id}`.
pub async fn get(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = $1 AND org_id = $2 AND status <> $3"
        ))
        .await?;
    let row = client
        .query_opt(&stmt, &[&id, &org.0, &EndpointStatus::Removed.code()])
        .await?
        .ok_or(NOT_FOUND)?;
    Ok(Answer::Endpoint(Box::new(endpoint_view(
        &row,
        ctx.config.circuit_failures,
    ))))
}

/// The secret answer: the previous secret's expiry only while it still signs.
fn secret_answer(row: &Row) -> Answer {
    Answer::EndpointSecret {
        signing_secret: row.get(0),
        previous_secret_expires_at: time(row, 1).filter(|t| *t > Micros::now()),
    }
}

/// `GET /api/endpoints/{id}/secret`.
pub async fn secret(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT signing_secret, previous_secret_expires_at FROM endpoints \
             WHERE id = $1 AND org_id = $2 AND status <> $3",
            &[&id, &org.0, &EndpointStatus::Removed.code()],
        )
        .await?
        .ok_or(NOT_FOUND)?;
    Ok(secret_answer(&row))
}

/// `POST /api/endpoints/{id}/secret/rotate`: a new secret (`given`, else a random one); the old
/// one signs too for the grace period (`--secret-rotation-grace-s`), so receivers can switch
/// without losing a delivery. A given secret that already is the current one changes nothing
/// (the previous one's grace is not extended) and is answered with the secret as it is: a
/// rotation retried after its answer was lost is safe.
pub async fn rotate_secret(
    ctx: &StoreCtx,
    org: OrgId,
    id: Uuid,
    given: Option<String>,
) -> Result<Answer, Refusal> {
    let secret = match given {
        Some(given) => given,
        None => new_signing_secret()?,
    };
    let now = Micros::now();
    let expires = now.plus(Duration::from_secs(ctx.config.secret_rotation_grace_s));
    let row = org_change!(ctx, org, "rotate endpoint secret", |tx| {
        let current = tx
            .query_opt(
                "SELECT signing_secret, previous_secret_expires_at FROM endpoints \
                 WHERE id = $1 AND org_id = $2 AND status <> $3 FOR UPDATE",
                &[&id, &org.0, &EndpointStatus::Removed.code()],
            )
            .await?
            .ok_or(NOT_FOUND)?;
        if current.get::<_, String>(0) == secret {
            current
        } else {
            tx.query_one(
                "UPDATE endpoints SET previous_secret = signing_secret, \
                     previous_secret_expires_at = $3, signing_secret = $2, updated_at = $4 \
                 WHERE id = $1 \
                 RETURNING signing_secret, previous_secret_expires_at",
                &[
                    &id,
                    &secret,
                    &expires.to_system_time(),
                    &now.to_system_time(),
                ],
            )
            .await?
        }
    });
    Ok(secret_answer(&row))
}

/// `PATCH /api/endpoints/{id}`: only the fields sent change.
pub async fn patch(
    ctx: &StoreCtx,
    org: OrgId,
    id: Uuid,
    patch: EndpointPatch,
) -> Result<Answer, Refusal> {
    if let Some(url) = &patch.url {
        check_url(ctx, org, url, "url").await?;
    }
    let now = Micros::now().to_system_time();
    let rate = patch.rate_limit_per_second.map(|r| r.map(|r| r as i32));
    let row = org_change!(ctx, org, "patch endpoint", |tx| {
        // A credential sent back as reads show it keeps the value the endpoint has for it.
        let headers = match &patch.headers {
            Some(lines) if endpoint_headers::has_redacted(lines) => {
                let stored: Vec<String> = tx
                    .query_opt(
                        "SELECT headers FROM endpoints \
                         WHERE id = $1 AND org_id = $2 AND status <> $3 FOR UPDATE",
                        &[&id, &org.0, &EndpointStatus::Removed.code()],
                    )
                    .await?
                    .ok_or(NOT_FOUND)?
                    .get(0);
                let filled =
                    endpoint_headers::fill_redacted(lines, &stored).map_err(|message| {
                        Refusal::Invalid {
                            field: "headers",
                            message,
                        }
                    })?;
                Some(filled)
            }
            other => other.clone(),
        };
        tx.query_opt(
            &format!(
                "UPDATE endpoints SET \
                     url = CASE WHEN $3 THEN $4 ELSE url END, \
                     event_types = CASE WHEN $5 THEN $6 ELSE event_types END, \
                     description = CASE WHEN $7 THEN $8 ELSE description END, \
                     rate_limit_per_second = CASE WHEN $9 THEN $10 ELSE rate_limit_per_second END, \
                     headers = COALESCE($13, headers), \
                     updated_at = $11 \
                 WHERE id = $1 AND org_id = $2 AND status <> $12 RETURNING {ENDPOINT_COLUMNS}"
            ),
            &[
                &id,
                &org.0,
                &patch.url.is_some(),
                &patch.url.as_deref().unwrap_or(""),
                &patch.event_types.is_some(),
                &patch.event_types.clone().flatten(),
                &patch.description.is_some(),
                &patch.description.clone().flatten(),
                &rate.is_some(),
                &rate.flatten(),
                &now,
                &EndpointStatus::Removed.code(),
                &headers,
            ],
        )
        .await?
        .ok_or(NOT_FOUND)?
    });
    Ok(Answer::Endpoint(Box::new(endpoint_view(
        &row,
        ctx.config.circuit_failures,
    ))))
}

/// Park an endpoint's pending deliveries that are due or scheduled: they wait, no attempt spent.
/// A node holding one in memory records its attempt in flight and then leaves it parked.
pub const PARK: &str = "UPDATE deliveries SET next_attempt_at = NULL \
     WHERE endpoint_id = $1 AND status = 0 AND next_attempt_at IS NOT NULL";

/// The first statement of a change that then writes the endpoint's deliveries (pause, resume,
/// delete): the endpoint, unless removed, locked `FOR UPDATE`, with when its circuit was to close.
/// A recorder locks the endpoints it writes (`KEY SHARE`, which only this lock mode blocks)
/// before their deliveries too, so the two take their locks in one order and never deadlock.
const LOCK_FOR_DELIVERIES: &str = "SELECT circuit_open_until FROM endpoints \
     WHERE id = $1 AND org_id = $2 AND status <> $3 FOR UPDATE";

/// `DELETE /api/endpoints/{id}`: nothing more is sent to it; events it matched no longer wait
/// for it (their status is judged over the endpoints that still exist).
pub async fn delete(ctx: &StoreCtx, org: OrgId, id: Uuid) -> Result<Answer, Refusal> {
    let now = Micros::now().to_system_time();
    org_change!(ctx, org, "delete endpoint", |tx| {
        tx.query_opt(
            LOCK_FOR_DELIVERIES,
            &[&id, &org.0, &EndpointStatus::Removed.code()],
        )
        .await?
        .ok_or(NOT_FOUND)?;
        tx.query_opt(
            "UPDATE endpoints SET status = $3, updated_at = $4 \
             WHERE id = $1 AND org_id = $2 AND status <> $3 RETURNING id",
            &[&id, &org.0, &EndpointStatus::Removed.code(), &now],
        )
        .await?
        .ok_or(NOT_FOUND)?;
        tx.execute(PARK, &[&id]).await?;
    });
    Ok(Answer::EndpointDeleted(id))
}

/// `POST /api/endpoints/{id}/pause` and `/resume`. Pausing parks the endpoint's pending
/// deliveries (new events that match it are stored parked too). Resuming (also a disabled
/// endpoint) starts its circuit afresh and makes every parked delivery due now, except those of
/// acknowledged events, and so are those handed back due when the old circuit was to close.
pub async fn set_paused(
    ctx: &StoreCtx,
    org: OrgId,
    id: Uuid,
    paused: bool,
) -> Result<Answer, Refusal> {
    let now = Micros::now().to_system_time();
    let row = org_change!(ctx, org, "pause or resume endpoint", |tx| {
        let circuit_until: Option<SystemTime> = tx
            .query_opt(
                LOCK_FOR_DELIVERIES,
                &[&id, &org.0, &EndpointStatus::Removed.code()],
            )
            .await?
            .ok_or(NOT_FOUND)?
            .get(0);
        if paused {
            let row = set_status(&tx, org, id, EndpointStatus::Paused, "", now)
                .await?
                .ok_or(NOT_FOUND)?;
            tx.execute(PARK, &[&id]).await?;
            row
        } else {
            let healthy = ", disabled_reason = NULL, consecutive_failures = 0, \
                           failing_since = NULL, circuit_open_until = NULL";
            let row = set_status(&tx, org, id, EndpointStatus::Active, healthy, now)
                .await?
                .ok_or(NOT_FOUND)?;
            // Deliveries handed back to the database while the circuit was open are due when it
            // was to close; the circuit starts afresh, so they are due now too.
            release_held(&tx, id, circuit_until, now).await?;
            row
        }
    });
    if !paused {
        ctx.delivery.wake();
    }
    Ok(Answer::Endpoint(Box::new(endpoint_view(
        &row,
        ctx.config.circuit_failures,
    ))))
}

/// What an endpoint made active again with a fresh circuit (a resume, the v1 webhook set again)
/// releases, due `now`: its parked deliveries, except those of acknowledged events, and those
/// handed back due when its old circuit (open until `circuit_until`) was to close. Locked first
/// with `LOCK_FOR_DELIVERIES`. A parked row a node still holds (its attempt in flight when the
/// pause came) gets that node's lease back instead, so it is not sent again beside itself: the
/// holder's outcome is recorded as usual, and only a node that died with it leaves it due when
/// its lease ends.
pub async fn release_held(
    tx: &Transaction<'_>,
    id: Uuid,
    circuit_until: Option<SystemTime>,
    now: SystemTime,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE deliveries d SET next_attempt_at = GREATEST($2, d.lease_until) FROM events e \
         WHERE d.endpoint_id = $1 AND d.status = 0 AND d.next_attempt_at IS NULL \
           AND e.id = d.event_id AND e.status <> $3",
        &[
            &id,
            &now,
            &crate::flow::event::EventStatus::Delivered.code(),
        ],
    )
    .await?;
    if let Some(until) = circuit_until {
        tx.execute(
            "UPDATE deliveries SET next_attempt_at = $2 \
             WHERE endpoint_id = $1 AND status = 0 AND next_attempt_at = $3",
            &[&id, &now, &until],
        )
        .await?;
    }
    Ok(())
}

/// Set an endpoint's status, and what `also` sets (`, column = value…`), unless it was removed:
/// its row as it is then, or none.
async fn set_status(
    tx: &Transaction<'_>,
    org: OrgId,
    id: Uuid,
    status: EndpointStatus,
    also: &str,
    now: SystemTime,
) -> Result<Option<Row>, tokio_postgres::Error> {
    tx.query_opt(
        &format!(
            "UPDATE endpoints SET status = $3, updated_at = $4{also} \
             WHERE id = $1 AND org_id = $2 AND status <> $5 \
             RETURNING {ENDPOINT_COLUMNS}"
        ),
        &[
            &id,
            &org.0,
            &status.code(),
            &now,
            &EndpointStatus::Removed.code(),
        ],
    )
    .await
}

/// `POST /api/endpoints/{id}/recover`: every delivery to the endpoint that ended failed at or
/// after `since` starts a new round (due now; parked while the endpoint is paused or disabled),
/// but those of events acknowledged since (an acknowledged event is not sent again; each event
/// looked up by key, a subquery per row, never a join over the organization's events).
pub async fn recover(ctx: &StoreCtx, org: OrgId, id: Uuid, since: Micros) -> Done<Answer> {
    let mut client = ctx.pool.get().await?;
    let tx = begin(&mut client).await?;
    let status: i16 = tx
        .query_opt(
            "SELECT status FROM endpoints WHERE id = $1 AND org_id = $2 AND status <> $3",
            &[&id, &org.0, &EndpointStatus::Removed.code()],
        )
        .await?
        .ok_or(NOT_FOUND)?
        .get(0);
    let now = Micros::now().to_system_time();
    let due = (status == EndpointStatus::Active.code()).then_some(now);
    let queued = tx
        .execute(
            "UPDATE deliveries d SET status = 0, retry_base = attempts, next_attempt_at = $3, \
                 failed_at = NULL \
             WHERE d.endpoint_id = $1 AND d.status = 2 AND d.failed_at >= $2 \
               AND (SELECT e.status FROM events e \
                    WHERE e.id = d.event_id AND e.org_id = d.org_id) <> $4",
            &[
                &id,
                &since.to_system_time(),
                &due,
                &EventStatus::Delivered.code(),
            ],
        )
        .await?;
    tx.commit().await?;
    if queued > 0 {
        ctx.delivery.wake();
    }
    Ok(Answer::Recovered { queued })
}

/// An endpoint's failed deliveries of events not acknowledged, the latest failure first (ties by
/// event id, descending), each with its attempt count and last attempt from the log, read in one
/// statement. The same rows as [`recover`] with the same `since` would start again.
/// `deliveries_recover` (endpoint, failed_at) serves the order, and each event is looked up by
/// key (`LATERAL … OFFSET 0`: as a join, the planner may read every event of the organization
/// first).
const FAILED: &str = "\
    SELECT d.event_id, e.type, d.failed_at, c.n, \
           l.attempt, l.at, l.response_status, l.error, l.duration_ms, l.response_body \
    FROM deliveries d \
    CROSS JOIN LATERAL (SELECT e.type, e.status FROM events e \
                        WHERE e.id = d.event_id AND e.org_id = d.org_id OFFSET 0) e \
    CROSS JOIN LATERAL (SELECT count(*)::int AS n FROM delivery_attempts a \
                        WHERE a.event_id = d.event_id AND a.endpoint_id = d.endpoint_id) c \
    LEFT JOIN LATERAL (SELECT a.attempt, a.at, a.response_status, a.error, a.duration_ms, \
                              a.response_body \
                       FROM delivery_attempts a \
                       WHERE a.event_id = d.event_id AND a.endpoint_id = d.endpoint_id \
                       ORDER BY a.at DESC, a.attempt DESC LIMIT 1) l ON true \
    WHERE d.endpoint_id = $1 AND d.org_id = $2 AND d.status = 2 AND e.status <> $7 \
      AND d.failed_at >= COALESCE($3, '-infinity'::timestamptz) \
      AND ($4::timestamptz IS NULL OR (d.failed_at, d.event_id) < ($4, $5)) \
    ORDER BY d.failed_at DESC, d.event_id DESC \
    LIMIT $6";

/// `GET /api/endpoints/{id}/failed`: a page of the endpoint's deliveries that ended failed at or
/// after `since`, before the cursor's (failed_at, event id).
pub async fn failed(
    ctx: &StoreCtx,
    org: OrgId,
    id: Uuid,
    since: Option<Micros>,
    limit: u32,
    before: Option<(Micros, Uuid)>,
) -> Done<Answer> {
    let client = ctx.pool.get().await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM endpoints WHERE id = $1 AND org_id = $2 AND status <> $3",
            &[&id, &org.0, &EndpointStatus::Removed.code()],
        )
        .await?;
    exists.ok_or(NOT_FOUND)?;
    let stmt = client.prepare_cached(FAILED).await?;
    let rows = client
        .query(
            &stmt,
            &[
                &id,
                &org.0,
                &since.map(Micros::to_system_time),
                &before.map(|(at, _)| at.to_system_time()),
                &before.map_or(Uuid::nil(), |(_, last)| last),
                &(i64::from(limit) + 1),
                &EventStatus::Delivered.code(),
            ],
        )
        .await?;
    let more = rows.len() > limit as usize;
    let deliveries: Vec<FailedDelivery> = rows
        .iter()
        .take(limit as usize)
        .map(|r| FailedDelivery {
            event_id: r.get(0),
            event_type: r.get(1),
            failed_at: Micros::from_system_time(r.get(2)),
            attempts: r.get(3),
            last_attempt: r.get::<_, Option<i32>>(4).map(|attempt| AttemptView {
                endpoint_id: id,
                attempt,
                at: Micros::from_system_time(r.get(5)),
                response_status: r.get(6),
                error: r.get(7),
                duration_ms: r.get(8),
                response_body: r.get(9),
            }),
        })
        .collect();
    let more_before = more
        .then(|| deliveries.last().map(|d| (d.failed_at, d.event_id)))
        .flatten();
    Ok(Answer::FailedDeliveries(FailedPage {
        deliveries,
        more_before,
    }))
}
