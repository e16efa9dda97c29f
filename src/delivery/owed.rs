//! Whether a delivery that waited in memory is still owed: an ack parks the event's delivery
//! rows and marks the event, and tells no node, so a delivery that waited (for its retry's time,
//! a circuit, a rate limit) looks before it goes on.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::model::{Job, Lease};
use super::shared::Shared;
use crate::db::describe;
use crate::flow::event::EventStatus;
use crate::ids::Micros;

/// Whether a delivery held in memory is still owed, as the database says (see [`still_owed`]).
pub(super) enum Owed {
    /// Still owed and this node's: it may go.
    Yes,
    /// Parked meanwhile (an ack; a pause this node had not heard of): nothing is sent.
    Parked,
    /// Under another lease or time, or gone: not this node's any more.
    Gone,
}

const ROW_LEASE: &str =
    "SELECT next_attempt_at FROM deliveries WHERE event_id = $1 AND endpoint_id = $2";
const EVENT_STATUS: &str = "SELECT status FROM events WHERE id = $1 AND org_id = $2";

/// Look before a delivery that waited in memory (for its retry's time, a circuit, a rate limit)
/// goes on: an ack parks the event's delivery rows and marks the event, and tells no node, so
/// without this look the node would send the acknowledged event once more. Under its own row's
/// lease (`Lease::Row`) the row must still hold it; under a batch's, the event must not be
/// acknowledged. When the database can't be read, it goes (its outcome is written only if the
/// delivery is still this node's).
pub(super) async fn still_owed(shared: &Shared, job: &Job) -> Owed {
    let work = async {
        let client = shared.pool.get().await.map_err(|e| e.to_string())?;
        let (sql, key): (&str, Uuid) = match job.lease {
            Lease::Row { .. } => (ROW_LEASE, job.endpoint),
            Lease::Batch(_) => (EVENT_STATUS, job.org.0),
        };
        let stmt = client.prepare_cached(sql).await.map_err(|e| describe(&e))?;
        client
            .query_opt(&stmt, &[&job.event.0, &key])
            .await
            .map_err(|e| describe(&e))
    };
    let row = match tokio::time::timeout(Duration::from_millis(shared.config.db_timeout_ms), work)
        .await
    {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "a waiting delivery could not look; it goes");
            return Owed::Yes;
        }
        Err(_) => return Owed::Yes,
    };
    let Some(row) = row else {
        return Owed::Gone;
    };
    match job.lease {
        Lease::Row { held } => match row.get::<_, Option<SystemTime>>(0) {
            None => Owed::Parked,
            Some(at) if Micros::from_system_time(at) == held => Owed::Yes,
            Some(_) => Owed::Gone,
        },
        Lease::Batch(_) if row.get::<_, i16>(0) == EventStatus::Delivered.code() => Owed::Parked,
        Lease::Batch(_) => Owed::Yes,
    }
}
