//! The columns of an event as the inbox and the event detail read them, and the reader that turns
//! such a row into a value.

use std::time::SystemTime;

use bytes::Bytes;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::flow::answer::EventView;
use crate::flow::event::EventStatus;
use crate::ids::Micros;

/// The columns of an event (table alias `e`), in the order [`event_view`] reads them.
pub const EVENT_COLUMNS: &str =
    "e.id, e.type, e.payload::text, e.dedup_id, e.status, e.attempts, e.created_at, e.delivered_at";

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
