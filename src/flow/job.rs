//! The work the store pool takes: event writes for the group commit, and everything else a request
//! waits for.

use std::net::IpAddr;

use uuid::Uuid;

use super::answer::{RateSnapshot, ReplyTo};
use super::event::{DedupKey, EventStatus, NewEvent};
use crate::auth::{ApiKey, OrgInfo, Tier};
use crate::ids::CoreId;

/// An authenticated request that the store answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// `GET /api/keys`.
    KeyInfo,
    /// `POST /api/keys/rotate`, from this client address.
    Rotate {
        /// The client's address (key operations are limited per address).
        peer: IpAddr,
    },
    /// `POST /api/webhook/config`, URL already shape-checked.
    SetWebhook {
        /// The URL as given.
        url: String,
    },
    /// `DELETE /api/webhook/config`.
    DeleteWebhook,
    /// `GET /api/events/{id}`.
    GetEvent {
        /// The event.
        id: Uuid,
    },
    /// `POST /api/events/{id}/redeliver`.
    Redeliver {
        /// The event.
        id: Uuid,
    },
    /// `GET /api/inbox`.
    Inbox {
        /// Page size, 1..=1000.
        limit: u32,
        /// Which events.
        status: EventStatus,
        /// Only events with a smaller id (the previous page's last).
        before: Option<Uuid>,
    },
    /// `POST /api/ack/{id}`.
    Ack {
        /// The event.
        id: Uuid,
    },
    /// `POST /api/ack`, ids de-duplicated in request order.
    AckBatch {
        /// The events.
        ids: Vec<Uuid>,
    },
}

/// Work for the store pool other than event writes.
#[derive(Debug)]
pub enum StoreJob {
    /// Verify a key that is not in a core's cache.
    Auth {
        /// The key.
        key: ApiKey,
        /// The client's address, for the failure throttle.
        peer: IpAddr,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// An authenticated query.
    Query {
        /// The caller's organization.
        org: OrgInfo,
        /// What it asks.
        query: Query,
        /// Rate-limit headers for the reply.
        rate: RateSnapshot,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// `POST /api/keys/generate`.
    Generate {
        /// Organization name, 1..=255 characters.
        name: String,
        /// Its tier.
        tier: Tier,
        /// The client's address (key operations are limited per address).
        peer: IpAddr,
        /// Where the answer goes.
        reply: ReplyTo,
    },
}

/// One event to write.
#[derive(Debug)]
pub struct WriteJob {
    /// The event.
    pub event: NewEvent,
    /// Where the answer goes; `None` in fast-ack mode (already answered 202).
    pub reply: Option<ReplyTo>,
    /// Rate-limit headers for the reply.
    pub rate: Option<RateSnapshot>,
    /// The dedup key reserved on the owner core, to settle after the write.
    pub dedup: Option<(DedupKey, CoreId)>,
}
