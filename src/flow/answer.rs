//! What the store and the owner cores answer, as values, and where an answer goes.
//!
//! A request that waits for another thread registers a slot on its core and sends the slot's
//! address ([`ReplyTo`]) with the work; whoever finishes the work sends a [`Completion`] back to
//! that core. The answer is a value ([`Outcome`]); the connection's core renders it as HTTP.

use bytes::Bytes;
use uuid::Uuid;

use super::event::EventStatus;
use crate::auth::{AuthFailure, OrgInfo, Tier};
use crate::ids::{CoreId, EventId, Micros};

/// What an organization's token bucket looked like when the request was handled; written as the
/// `X-RateLimit-*` headers of every authenticated response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSnapshot {
    /// Events per minute (the bucket's capacity).
    pub limit: u32,
    /// Whole tokens left.
    pub remaining: u32,
    /// Whole seconds until the bucket is full again.
    pub reset_s: u32,
}

/// Why a stage did not do what was asked. The edge maps each to a status (`crate::error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The database cannot be reached, or it cannot write right now (read-only, disk full...).
    Unavailable,
    /// A bounded queue or pool is full; the phrase says which.
    Overloaded(&'static str),
    /// The organization's budget is spent.
    RateLimited {
        /// Events per minute.
        limit: u32,
        /// Seconds until one event fits again.
        retry_after_s: u32,
    },
    /// The key is not valid.
    Unauthorized(&'static str),
    /// Too many failed keys from this client address.
    AuthThrottled {
        /// Seconds until the address may try again.
        retry_after_s: u32,
    },
    /// Too many key generations or rotations from this address, or on this node.
    KeyOpsLimited {
        /// Seconds until one more is allowed.
        retry_after_s: u32,
    },
    /// No such thing for this organization.
    NotFound(&'static str),
    /// The organization has no webhook.
    NoWebhook,
    /// A value was refused (a webhook host that does not resolve, a row the database refused).
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong, as a sentence.
        message: String,
    },
    /// A webhook host could not be looked up now: the DNS resolver failed or did not answer
    /// (the server's trouble, or the host's DNS servers'; not the client's).
    ResolverDown,
    /// This node's clock is further off the database's than `--clock-offset-max-ms`: it takes
    /// no events until it is back (ids, leases and retention go by clocks).
    ClockOff,
    /// A bug or an unexpected database answer; the details are in the log.
    Internal,
}

impl Refusal {
    /// Whether this is the server's own trouble (503, retry), not the client's.
    pub fn is_servers(&self) -> bool {
        matches!(
            self,
            Refusal::Unavailable
                | Refusal::Overloaded(_)
                | Refusal::ResolverDown
                | Refusal::ClockOff
                | Refusal::Internal
        )
    }
}

impl From<AuthFailure> for Refusal {
    fn from(f: AuthFailure) -> Refusal {
        match f {
            AuthFailure::Refused => Refusal::Unauthorized("invalid API key"),
            AuthFailure::Throttled { retry_after_s } => Refusal::AuthThrottled { retry_after_s },
        }
    }
}

/// How an ingest ended: the one outcome type from the owner core and the writer back to the
/// connection, which renders it (201, 202, 409, or the refusal's status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Committed (durable mode).
    Committed,
    /// Queued (fast-ack mode).
    Queued,
    /// The organization already has an event with this dedup id: this is the first one.
    Duplicate(EventId),
    /// Not taken (rate limit, overload, the database's trouble, a row the database refused).
    Refused(Refusal),
}

/// An [`Ingested`] with the organization's bucket as its owner saw it, for the rate headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestOutcome {
    /// What happened to the event.
    pub result: Ingested,
    /// The bucket, when the request reached the owner.
    pub rate: Option<RateSnapshot>,
}

/// Identifies one waiting request within its core: slot index and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotToken(pub u64);

/// Where an answer goes: a core and a slot there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The core that holds the connection.
    pub core: CoreId,
    /// The waiting request's slot on that core.
    pub slot: SlotToken,
}

/// An answer for a waiting request.
#[derive(Debug)]
pub enum Outcome {
    /// How an ingest ended.
    Ingested(IngestOutcome),
    /// The store's answer to a query, with the bucket for the rate headers.
    Answered {
        /// The answer, or why there is none.
        answer: Result<Answer, Refusal>,
        /// The bucket as the owner saw it (authenticated queries).
        rate: Option<RateSnapshot>,
    },
    /// The result of verifying a key that was not in the core's cache.
    Auth(Result<OrgInfo, Refusal>),
    /// An organization's bucket, read by its owner.
    Rate(RateSnapshot),
}

/// An answer addressed to a slot.
#[derive(Debug)]
pub struct Completion {
    /// The waiting request.
    pub slot: SlotToken,
    /// Its answer.
    pub outcome: Outcome,
}

/// The store's answer to a [`super::job::Query`] or an unauthenticated job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `GET /api/keys`.
    KeyInfo(KeyInfo),
    /// `POST /api/keys/generate`.
    Generated(NewKey),
    /// `POST /api/keys/rotate`.
    Rotated(NewKey),
    /// `POST /api/webhook/config`.
    WebhookSet(WebhookConfig),
    /// `DELETE /api/webhook/config`.
    WebhookDeleted(WebhookConfig),
    /// `GET /api/events/{id}`.
    Event(Box<EventDetail>),
    /// `POST /api/events/{id}/redeliver`: queued again.
    Redelivered(Uuid),
    /// One endpoint (created, read, changed, paused, resumed).
    Endpoint(Box<EndpointView>),
    /// The endpoint an earlier create with the same `Idempotency-Key` and body made, as it is
    /// now, with its secret.
    EndpointReplayed(Box<EndpointView>),
    /// Every endpoint of the organization.
    Endpoints(Vec<EndpointView>),
    /// An endpoint's secret (read or rotated).
    EndpointSecret {
        /// `whsec_…`.
        signing_secret: String,
        /// Until when deliveries carry the previous secret's signature too.
        previous_secret_expires_at: Option<Micros>,
    },
    /// `DELETE /api/endpoints/{id}`.
    EndpointDeleted(Uuid),
    /// `POST /api/endpoints/{id}/recover`: deliveries that start a new round.
    Recovered {
        /// How many.
        queued: u64,
    },
    /// `GET /api/endpoints/{id}/failed`.
    FailedDeliveries(FailedPage),
    /// `GET /api/inbox`.
    Inbox(InboxPage),
    /// `POST /api/ack/{id}`.
    Acked {
        /// The event.
        id: Uuid,
        /// When it was first acknowledged.
        acknowledged_at: Micros,
    },
    /// `POST /api/ack`.
    AckedBatch {
        /// Acknowledged now or before, in request order.
        acknowledged: Vec<Uuid>,
        /// Not this organization's, or unknown, in request order.
        not_found: Vec<Uuid>,
    },
}

/// An organization as `GET /api/keys` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The organization.
    pub organization_id: Uuid,
    /// Its name.
    pub organization_name: String,
    /// Its tier's API name.
    pub tier: String,
    /// Its limit.
    pub rate_limit_per_minute: i32,
    /// Its webhook, if any.
    pub webhook_url: Option<String>,
    /// Scheme and key id of its key.
    pub key_prefix: String,
    /// When it was created.
    pub created_at: Micros,
    /// When its key was last rotated.
    pub rotated_at: Option<Micros>,
}

/// A key just made (generated with a new organization, or rotated); shown once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The whole key.
    pub api_key: String,
    /// The organization.
    pub organization_id: Uuid,
    /// Its name.
    pub organization_name: String,
    /// Its tier (generation only).
    pub tier: Option<Tier>,
    /// When the key was made.
    pub at: Micros,
}

/// An organization's webhook configuration after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The organization.
    pub organization_id: Uuid,
    /// The URL; `None` after a delete.
    pub webhook_url: Option<String>,
    /// The signing secret (set only).
    pub signing_secret: Option<String>,
    /// When it changed.
    pub updated_at: Micros,
}

/// An event as the inbox shows it; the payload is the bytes that were received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventView {
    /// The event.
    pub id: Uuid,
    /// Its type.
    pub event_type: String,
    /// Its payload, JSON text as received.
    pub payload: Bytes,
    /// Its dedup id.
    pub dedup_id: Option<String>,
    /// Its status.
    pub status: EventStatus,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// When it was accepted.
    pub created_at: Micros,
    /// When it was delivered or acknowledged.
    pub delivered_at: Option<Micros>,
}

/// An endpoint's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointStatus {
    /// Deliveries go to it.
    Active = 0,
    /// Deliveries wait (new events too) until it is resumed.
    Paused = 1,
    /// Turned off by a 410 Gone or by failing for too long; events no longer match it.
    Disabled = 2,
    /// Deleted (kept for history; a deleted default endpoint keeps the organization's secret).
    Removed = 3,
}

impl EndpointStatus {
    /// From the database's smallint.
    pub fn from_i16(v: i16) -> EndpointStatus {
        match v {
            1 => EndpointStatus::Paused,
            2 => EndpointStatus::Disabled,
            3 => EndpointStatus::Removed,
            _ => EndpointStatus::Active,
        }
    }

    /// The database's smallint.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointStatus::Active => "active",
            EndpointStatus::Paused => "paused",
            EndpointStatus::Disabled => "disabled",
            EndpointStatus::Removed => "removed",
        }
    }
}

/// An endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Deliveries flow.
    Closed,
    /// Too many consecutive failures: nothing is sent until it is half-open.
    Open,
    /// One probe may go through; its success closes the circuit.
    HalfOpen,
}

impl Circuit {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

/// An endpoint's health as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointHealth {
    /// The circuit breaker.
    pub circuit: Circuit,
    /// Failed attempts since the last success.
    pub consecutive_failures: i32,
    /// The last success.
    pub last_success_at: Option<Micros>,
    /// The last failure.
    pub last_failure_at: Option<Micros>,
}

/// An endpoint as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    /// Its id.
    pub id: Uuid,
    /// Where deliveries go.
    pub url: String,
    /// Its patterns (`None`: every type).
    pub event_types: Option<Vec<String>>,
    /// Its description.
    pub description: Option<String>,
    /// Attempts per second at most.
    pub rate_limit_per_second: Option<i32>,
    /// Headers of its own, as sent (`name: value`).
    pub headers: Vec<String>,
    /// Its status.
    pub status: EndpointStatus,
    /// The secret, only when just created.
    pub signing_secret: Option<String>,
    /// Its health.
    pub health: EndpointHealth,
    /// When it was created.
    pub created_at: Micros,
    /// When it last changed.
    pub updated_at: Micros,
}

/// One endpoint's delivery of an event as the event detail shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryView {
    /// The endpoint.
    pub endpoint_id: Uuid,
    /// Pending, delivered or failed.
    pub status: EventStatus,
    /// Attempts made, every round.
    pub attempts: i32,
    /// When the next attempt is due (or, while a node holds it, its lease's end).
    pub next_attempt_at: Option<Micros>,
    /// When it was delivered.
    pub delivered_at: Option<Micros>,
}

/// One delivery attempt as the event detail shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptView {
    /// The endpoint it went to.
    pub endpoint_id: Uuid,
    /// 1, 2, ... per endpoint.
    pub attempt: i32,
    /// When it started.
    pub at: Micros,
    /// The receiver's status, if it answered.
    pub response_status: Option<i16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: i32,
    /// The first 1 KiB of the receiver's answer.
    pub response_body: Option<String>,
}

/// One delivery to an endpoint that ended failed, as `GET /api/endpoints/{id}/failed` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedDelivery {
    /// The event.
    pub event_id: Uuid,
    /// Its type.
    pub event_type: String,
    /// When its last round ended failed.
    pub failed_at: Micros,
    /// Its attempts to this endpoint, every round (the attempt log's count).
    pub attempts: i32,
    /// The last of them, when the log still has it.
    pub last_attempt: Option<AttemptView>,
}

/// A page of an endpoint's failed deliveries, the latest failure first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedPage {
    /// The deliveries.
    pub deliveries: Vec<FailedDelivery>,
    /// The last one's (failed_at, event id) when there are more (the next page's cursor).
    pub more_before: Option<(Micros, Uuid)>,
}

/// `GET /api/events/{id}`: the event, its delivery per endpoint, and its attempts, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDetail {
    /// The event.
    pub event: EventView,
    /// Its delivery to each endpoint it matched.
    pub deliveries: Vec<DeliveryView>,
    /// Its attempts.
    pub attempts: Vec<AttemptView>,
}

/// One page of the inbox, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    /// The events.
    pub events: Vec<EventView>,
    /// The last id of this page when there are more (the next page's cursor).
    pub more_before: Option<Uuid>,
}
