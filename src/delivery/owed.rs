//! Whether a delivery that waited in memory is still owed: an ack parks the event's delivery
//! rows and marks the event, and tells no node, so a delivery that waited (for its retry's time,
//! a circuit, a rate limit) looks before it goes on. The looks of a node are gathered for a few
//! milliseconds and answered by one read (a delivery that waited can wait that much more): a
//! rate-limited endpoint sends one delivery after another, each after a wait, and one read each
//! was half of PostgreSQL's CPU per delivery (BENCHMARKS.md, thirteenth session).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use uuid::Uuid;

use super::model::{Job, Lease, Look, Owed};
use super::shared::Shared;
use crate::config::{LOOK_BATCH_MAX, LOOK_LINGER};
use crate::db::describe;
use crate::flow::event::EventStatus;
use crate::ids::Micros;

/// Every delivery row of the events (its lease, by endpoint). The ids' lowest and highest bound
/// the scan too: a generic plan can't prune the day partitions by an array, but it prunes them by
/// a range when it runs (as the claim does), so only the days of these events are looked in.
const ROW_LEASES: &str = "SELECT event_id, endpoint_id, next_attempt_at FROM deliveries \
     WHERE event_id = ANY($1) AND event_id >= $2 AND event_id <= $3";
/// The events' organizations and statuses (bounded the same way).
const EVENT_STATUSES: &str =
    "SELECT id, org_id, status FROM events WHERE id = ANY($1) AND id >= $2 AND id <= $3";

/// Look before a delivery that waited in memory (for its retry's time, a circuit, a rate limit)
/// goes on: an ack parks the event's delivery rows and marks the event, and tells no node, so
/// without this look the node would send the acknowledged event once more. Under its own row's
/// lease (`Lease::Row`) the row must still hold it; under a batch's, the event must not be
/// acknowledged. When the database can't be read, it goes (its outcome is written only if the
/// delivery is still this node's).
pub(super) async fn still_owed(shared: &Shared, job: &Job) -> Owed {
    let (answer, answered) = oneshot::channel();
    let look = Look {
        event: job.event,
        org: job.org,
        endpoint: job.endpoint,
        held: match job.lease {
            Lease::Row { held } => Some(held),
            Lease::Batch(_) => None,
        },
        answer,
    };
    if shared.looks.send(look).is_err() {
        return Owed::Yes;
    }
    answered.await.unwrap_or(Owed::Yes)
}

/// Answer the node's looks: what arrives within [`LOOK_LINGER`] of the first one (up to
/// [`LOOK_BATCH_MAX`]) is answered by one round trip.
pub(super) async fn look_loop(shared: Arc<Shared>, mut looks: mpsc::UnboundedReceiver<Look>) {
    let mut batch = Vec::with_capacity(LOOK_BATCH_MAX);
    loop {
        if looks.recv_many(&mut batch, LOOK_BATCH_MAX).await == 0 {
            return;
        }
        if batch.len() < LOOK_BATCH_MAX {
            tokio::time::sleep(LOOK_LINGER).await;
            while batch.len() < LOOK_BATCH_MAX {
                match looks.try_recv() {
                    Ok(look) => batch.push(look),
                    Err(_) => break,
                }
            }
        }
        answer(&shared, &mut batch).await;
    }
}

/// What the database holds for a batch of looks.
#[derive(Default)]
struct Found {
    /// (event, endpoint) → the row's lease.
    rows: HashMap<(Uuid, Uuid), Option<SystemTime>>,
    /// event → (organization, status).
    events: HashMap<Uuid, (Uuid, i16)>,
}

/// Read what the looks need and answer each (every one `Yes` when the database can't say).
async fn answer(shared: &Shared, batch: &mut Vec<Look>) {
    let found = match shared.timed(read(shared, batch)).await {
        Ok(found) => Some(found),
        Err(e) => {
            tracing::debug!(error = %e, "waiting deliveries could not look; they go");
            None
        }
    };
    for look in batch.drain(..) {
        let owed = found.as_ref().map_or(Owed::Yes, |f| owed(f, &look));
        let _ = look.answer.send(owed);
    }
}

async fn read(shared: &Shared, batch: &[Look]) -> Result<Found, String> {
    let mut by_row = Vec::new();
    let mut by_event = Vec::new();
    for look in batch {
        match look.held {
            Some(_) => by_row.push(look.event.0),
            None => by_event.push(look.event.0),
        }
    }
    let client = shared
        .pool
        .get()
        .await
        .map_err(|e| crate::db::describe_pool(&e))?;
    // Both in one round trip when both are asked.
    let (rows, events) = tokio::try_join!(
        rows_of(&client, ROW_LEASES, &by_row),
        rows_of(&client, EVENT_STATUSES, &by_event)
    )?;
    Ok(Found {
        rows: rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect(),
        events: events
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect(),
    })
}

/// The rows `sql` finds for `ids` (none asked: none found, no query).
async fn rows_of(
    client: &deadpool_postgres::Object,
    sql: &str,
    ids: &[Uuid],
) -> Result<Vec<Row>, String> {
    let (Some(low), Some(high)) = (ids.iter().min(), ids.iter().max()) else {
        return Ok(Vec::new());
    };
    let stmt = client.prepare_cached(sql).await.map_err(|e| describe(&e))?;
    client
        .query(&stmt, &[&ids, low, high])
        .await
        .map_err(|e| describe(&e))
}

/// One look's answer from what was read.
fn owed(found: &Found, look: &Look) -> Owed {
    match look.held {
        Some(held) => match found.rows.get(&(look.event.0, look.endpoint)) {
            None => Owed::Gone,
            Some(None) => Owed::Parked,
            Some(Some(at)) if Micros::from_system_time(*at) == held => Owed::Yes,
            Some(Some(_)) => Owed::Gone,
        },
        None => match found.events.get(&look.event.0) {
            Some((org, _)) if *org != look.org.0 => Owed::Gone,
            None => Owed::Gone,
            Some((_, status)) if *status == EventStatus::Delivered.code() => Owed::Parked,
            Some(_) => Owed::Yes,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, OrgId};

    fn ids<const N: usize>(from: u128) -> [Uuid; N] {
        std::array::from_fn(|i| Uuid::from_u128(from + i as u128))
    }

    fn look(event: Uuid, org: Uuid, endpoint: Uuid, held: Option<Micros>) -> Look {
        Look {
            event: EventId(event),
            org: OrgId(org),
            endpoint,
            held,
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn a_row_lease_is_owed_only_while_the_row_holds_it() {
        let [ev, org, ep, other, unknown] = ids(1);
        let held = Micros(1_700_000_000_000_000);
        let mut found = Found::default();
        found.rows.insert((ev, ep), Some(held.to_system_time()));
        found.rows.insert((ev, other), None);
        assert_eq!(owed(&found, &look(ev, org, ep, Some(held))), Owed::Yes);
        // Taken over (another lease), parked (an ack, a pause), or gone.
        assert_eq!(
            owed(&found, &look(ev, org, ep, Some(Micros(held.0 + 1)))),
            Owed::Gone
        );
        assert_eq!(
            owed(&found, &look(ev, org, other, Some(held))),
            Owed::Parked
        );
        assert_eq!(
            owed(&found, &look(unknown, org, ep, Some(held))),
            Owed::Gone
        );
    }

    #[test]
    fn a_batch_lease_is_owed_until_the_event_is_acknowledged() {
        let [ev, acked, org, ep, unknown] = ids(10);
        let mut found = Found::default();
        found.events.insert(ev, (org, EventStatus::Pending.code()));
        found
            .events
            .insert(acked, (org, EventStatus::Delivered.code()));
        assert_eq!(owed(&found, &look(ev, org, ep, None)), Owed::Yes);
        assert_eq!(owed(&found, &look(acked, org, ep, None)), Owed::Parked);
        // Another organization's event of that id, or none: not this delivery's.
        assert_eq!(owed(&found, &look(ev, unknown, ep, None)), Owed::Gone);
        assert_eq!(owed(&found, &look(unknown, org, ep, None)), Owed::Gone);
    }
}
