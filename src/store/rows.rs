//! The columns of an event as the inbox and the event detail read them, and the reader that turns
//! such a row into a value. An event's status, attempts and delivery time are derived (see
//! `migrations/0003_endpoints.sql`): from its acknowledgement, or from its per-endpoint
//! deliveries and attempt log, by the SQL function `triggers_event_state`.

use std::time::SystemTime;

use bytes::Bytes;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::flow::answer::EventView;
use crate::flow::event::EventStatus;
use crate::ids::Micros;

/// The derived state of event `e` as table `st`, for a `FROM events e, …` clause.
pub const EVENT_STATE: &str =
    "LATERAL triggers_event_state(e.status, e.id, e.endpoints, e.delivered_at) st";

/// The columns of an event (table alias `e`, its state `st`), in the order [`event_view`] reads
/// them.
pub const EVENT_COLUMNS: &str = "e.id, e.type, e.payload::text, e.dedup_id, st.status, \
     st.attempts, e.created_at, st.delivered_at";

/// One event row as a value; the payload is the bytes that were received.
pub fn event_view(row: &Row) -> EventView {
    EventView {
        id: row.get::<_, Uuid>(0),
        event_type: row.get(1),
        payload: Bytes::copy_from_slice(row.get::<_, &str>(2).as_bytes()),
        dedup_id: row.get(3),
        status: EventStatus::from_i16(row.get(4)),
        attempts: row.get(5),
        created_at: Micros::from_system_time(row.get(6)),
        delivered_at: row
            .get::<_, Option<SystemTime>>(7)
            .map(Micros::from_system_time),
    }
}
