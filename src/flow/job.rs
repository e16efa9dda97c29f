//! The work the store pool takes: event writes for the group commit, and everything else a request
//! waits for.

use std::net::IpAddr;

use uuid::Uuid;

use super::answer::{RateSnapshot, ReplyTo};
use super::event::{DedupKey, EventStatus, NewEvent};
use crate::auth::{ApiKey, OrgInfo, Tier};
use crate::ids::{CoreId, Micros, OrgId};

/// An authenticated request that the store answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// `GET /api/keys`.
    KeyInfo,
    /// `POST /api/keys/rotate`, from this client address.
    Rotate {
        /// The client's address (key operations are limited per address).
        peer: IpAddr,
        /// SHA-256 of the request's `Idempotency-Key`: the retired key may ask this rotation
        /// again for a while. `None`: it may not.
        retry_key: Option<[u8; 32]>,
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
        /// Only this endpoint (else every endpoint matching the event's type now).
        endpoint: Option<Uuid>,
    },
    /// `POST /api/endpoints`, fields shape-checked.
    CreateEndpoint {
        /// The endpoint.
        spec: EndpointSpec,
        /// The request's `Idempotency-Key`, if it sent one.
        once: Option<Once>,
    },
    /// `GET /api/endpoints`.
    ListEndpoints,
    /// `GET /api/endpoints/{id}`.
    GetEndpoint {
        /// The endpoint.
        id: Uuid,
    },
    /// `GET /api/endpoints/{id}/secret`.
    GetEndpointSecret {
        /// The endpoint.
        id: Uuid,
    },
    /// `PATCH /api/endpoints/{id}`.
    PatchEndpoint {
        /// The endpoint.
        id: Uuid,
        /// What changes.
        patch: EndpointPatch,
    },
    /// `DELETE /api/endpoints/{id}`.
    DeleteEndpoint {
        /// The endpoint.
        id: Uuid,
    },
    /// `POST /api/endpoints/{id}/pause` (`paused`) and `/resume`.
    SetEndpointPaused {
        /// The endpoint.
        id: Uuid,
        /// Pause or resume.
        paused: bool,
    },
    /// `POST /api/endpoints/{id}/secret/rotate`.
    RotateEndpointSecret {
        /// The endpoint.
        id: Uuid,
        /// The new secret, kept as [`crate::signing_secret::normalize`] gives it; `None`: a random one.
        secret: Option<String>,
    },
    /// `POST /api/endpoints/{id}/recover`.
    RecoverEndpoint {
        /// The endpoint.
        id: Uuid,
        /// Deliveries that ended failed at or after this time start a new round.
        since: Micros,
    },
    /// `GET /api/endpoints/{id}/failed`: what `recover` with the same `since` would start again.
    FailedDeliveries {
        /// The endpoint.
        id: Uuid,
        /// Only deliveries that ended failed at or after this time.
        since: Option<Micros>,
        /// Page size, 1..=1000.
        limit: u32,
        /// Only those before this (failed_at, event id): the previous page's last.
        before: Option<(Micros, Uuid)>,
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

/// A new endpoint, its fields checked for shape (the URL's host is resolved by the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// http(s) URL.
    pub url: String,
    /// Patterns; `None`: every type (not the operational ones).
    pub event_types: Option<Vec<String>>,
    /// Up to 255 characters.
    pub description: Option<String>,
    /// Attempts per second at most; `None`: no limit.
    pub rate_limit_per_second: Option<u32>,
    /// Headers of its own, as sent (`name: value`), checked by [`crate::endpoint_headers`].
    pub headers: Vec<String>,
    /// Its signing secret, kept as [`crate::signing_secret::normalize`] gives it; `None`: a random one.
    pub signing_secret: Option<String>,
}

/// A create's `Idempotency-Key` and what it was sent with: a repeat with the same key and the
/// same body is answered with what the first made; with another body it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    /// The key, as sent (checked by ingress).
    pub key: String,
    /// SHA-256 of the request body, byte for byte.
    pub body_sha256: [u8; 32],
}

/// A key generation sent with an `Idempotency-Key`: what lets it be asked again when its answer
/// is lost (`store::keys::generate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerateOnce {
    /// SHA-256 of the `Idempotency-Key`.
    pub key_sha256: [u8; 32],
    /// SHA-256 of the request body, byte for byte.
    pub body_sha256: [u8; 32],
}

/// A change to an endpoint: `None` leaves a field as it is; `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPatch {
    /// A new URL.
    pub url: Option<String>,
    /// New patterns (`Some(None)`: every type).
    pub event_types: Option<Option<Vec<String>>>,
    /// A new description.
    pub description: Option<Option<String>>,
    /// A new limit.
    pub rate_limit_per_second: Option<Option<u32>>,
    /// New headers of its own (`Some(vec![])`: none).
    pub headers: Option<Vec<String>>,
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
    /// What one core's organizations spent of their rate limits since its last report: the
    /// cluster's balance of each comes back to that core.
    RateReport {
        /// The core whose buckets spent it.
        core: CoreId,
        /// One entry per organization with spend.
        spent: Vec<RateSpend>,
    },
    /// `POST /api/keys/rotate` asked again with the key an earlier rotation retired and that
    /// rotation's `Idempotency-Key`, because its answer was lost.
    RetryRotation {
        /// The retired key, as sent (not verified by any cache).
        key: ApiKey,
        /// SHA-256 of the `Idempotency-Key`.
        retry_key: [u8; 32],
        /// The client's address (failures are throttled per address).
        peer: IpAddr,
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
        /// Sent with an `Idempotency-Key`: a repeat within `--key-rotation-retry-s` gets the
        /// organization the first made.
        once: Option<GenerateOnce>,
        /// Where the answer goes.
        reply: ReplyTo,
    },
}

/// Tokens one organization spent on one node since that node last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpend {
    /// The organization.
    pub org: OrgId,
    /// Its limit, events per minute (the cluster's bucket takes the latest).
    pub limit: u32,
    /// Tokens spent.
    pub spent: u32,
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
