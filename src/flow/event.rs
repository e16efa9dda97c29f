//! An event on its way in, its delivery status, and how an ingest ended.

use bytes::Bytes;

use crate::ids::{EventId, Micros, OrgId};

/// A 128-bit keyed hash of (organization, dedup id), made by the owner core's shard.
pub type DedupKey = u128;

/// An event that passed validation, on its way to the store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// UUIDv7, assigned when the event was validated.
    pub id: EventId,
    /// The owning organization.
    pub org: OrgId,
    /// The event type, 1..255 characters.
    pub event_type: Box<str>,
    /// The payload exactly as received (valid JSON text).
    pub payload: Bytes,
    /// The optional dedup id, 1..255 characters.
    pub dedup_id: Option<Box<str>>,
    /// When the event was accepted.
    pub created_at: Micros,
    /// The W3C `traceparent` it came with (checked), sent with its deliveries.
    pub traceparent: Option<Box<str>>,
}

/// The events table's status of an event that matched endpoints: its status is derived from its
/// deliveries (see `migrations/0003_endpoints.sql`). 0 and 1 are stored as they are: pending
/// without endpoint, and acknowledged.
pub const STATUS_DERIVED: i16 = 3;

/// An event's delivery status, stored as a smallint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    /// Waiting for delivery or for the inbox.
    Pending = 0,
    /// Delivered to the webhook or acknowledged.
    Delivered = 1,
    /// Every delivery attempt failed (dead letter).
    Failed = 2,
}

impl EventStatus {
    /// Parse the API name.
    pub fn parse(s: &str) -> Option<EventStatus> {
        match s {
            "pending" => Some(EventStatus::Pending),
            "delivered" => Some(EventStatus::Delivered),
            "failed" => Some(EventStatus::Failed),
            _ => None,
        }
    }

    /// From the database's smallint.
    pub fn from_i16(v: i16) -> EventStatus {
        match v {
            1 => EventStatus::Delivered,
            2 => EventStatus::Failed,
            _ => EventStatus::Pending,
        }
    }

    /// The database's smallint: SQL binds this, never a bare number.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Delivered => "delivered",
            EventStatus::Failed => "failed",
        }
    }
}
