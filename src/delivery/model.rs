//! The values delivery works with: an event held in memory, where it goes, and what one attempt did.

use std::time::Duration;

use bytes::Bytes;

use crate::flow::event::NewEvent;
use crate::ids::{EventId, Micros, OrgId};

/// An event this node holds in memory for delivery.
#[derive(Debug, Clone)]
pub struct Job {
    /// The event.
    pub event: EventId,
    /// Its organization.
    pub org: OrgId,
    /// Its type.
    pub event_type: Box<str>,
    /// Its payload, as received.
    pub payload: Bytes,
    /// When it was accepted.
    pub created_at: Micros,
    /// Attempts made so far, all rounds.
    pub attempts: u32,
    /// Attempts made when the current round began (a redelivery starts a round).
    pub retry_base: u32,
    /// The `next_attempt_at` this node holds: its lease. Updates are conditional on it.
    pub held: Micros,
    /// When to attempt.
    pub due: Micros,
}

impl Job {
    /// A job for an event just committed with a lease for this node, due now.
    pub fn committed(event: NewEvent, held: Micros) -> Job {
        Job {
            event: event.id,
            org: event.org,
            event_type: event.event_type,
            payload: event.payload,
            created_at: event.created_at,
            attempts: 0,
            retry_base: 0,
            held,
            due: Micros::now(),
        }
    }

    /// A job with a payload, for unit tests.
    #[cfg(test)]
    pub fn test(event: EventId, org: OrgId, payload: &str) -> Job {
        Job {
            event,
            org,
            event_type: "t".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            created_at: Micros(1_000_000),
            attempts: 0,
            retry_base: 0,
            held: Micros(0),
            due: Micros(0),
        }
    }
}

/// Where an organization's events go: its webhook URL and signing key.
#[derive(Debug)]
pub struct Target {
    /// The URL as configured.
    pub url: String,
    /// The URL as a request URI.
    pub uri: http::Uri,
    /// The decoded signing secret.
    pub key: Vec<u8>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx.
    Delivered,
    /// 410 Gone: the receiver asks us to stop; the webhook is removed.
    Gone,
    /// Anything else; `retry_after` when the receiver said when to come back.
    Failed {
        /// The receiver's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

/// What one attempt did, as the attempt log records it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it started.
    pub at: Micros,
    /// The response status, if a response came.
    pub status: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long it took.
    pub duration: Duration,
    /// The outcome.
    pub verdict: Verdict,
}
