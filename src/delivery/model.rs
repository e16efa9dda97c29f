//! The values delivery works with: an endpoint as delivery sees it, one delivery held in memory
//! and the lease it is held under, and what one attempt did.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::client::Target;
use super::runtime::EndpointRuntime;
use super::sign::SigningKey;
use crate::event_types::endpoint_takes;
use crate::flow::answer::EndpointStatus;
use crate::ids::{EventId, Micros, OrgId};

/// An endpoint as delivery sees it (active or paused; others are not loaded).
#[derive(Debug)]
pub struct Endpoint {
    /// Its id.
    pub id: Uuid,
    /// Its organization.
    pub org: OrgId,
    /// The URL as configured.
    pub url: String,
    /// Where its requests go, worked out once (`None`: the URL is not an http or https URI with
    /// a host; deliveries to it fail).
    pub target: Option<Target>,
    /// Its patterns (`None`: every type but the operational ones).
    pub patterns: Option<Vec<String>>,
    /// Active or paused.
    pub status: EndpointStatus,
    /// The decoded signing keys: the current one, then the previous one while it still signs.
    pub keys: Vec<SigningKey>,
    /// Until when the previous key signs too.
    pub previous_until: Option<Micros>,
    /// Attempts per second at most.
    pub rate_limit: Option<u32>,
    /// When its configuration last changed (a resume resets the circuit kept in memory).
    pub updated_at: Micros,
    /// Its recorded health: failed attempts since the last success.
    pub consecutive_failures: u32,
    /// Since when every attempt has failed.
    pub failing_since: Option<Micros>,
    /// Until when its circuit is open.
    pub circuit_open_until: Option<Micros>,
    /// The endpoint cache's change epoch its load started at: it shows every change recorded
    /// by then.
    pub loaded_at: u64,
}

impl Endpoint {
    /// Whether an event of `event_type` goes to it.
    pub fn takes(&self, event_type: &str) -> bool {
        endpoint_takes(self.patterns.as_deref(), event_type)
    }

    /// The keys a delivery made at `now` is signed with: the current one, and the previous one
    /// during the rotation's grace period.
    pub fn signing_keys(&self, now: Micros) -> &[SigningKey] {
        let both = self.previous_until.is_some_and(|t| t > now);
        &self.keys[..if both {
            self.keys.len()
        } else {
            1.min(self.keys.len())
        }]
    }
}

/// The lease of one group commit's deliveries, or of one claim's first attempts, held by this
/// node: one `delivery_batches` row.
#[derive(Debug)]
pub struct BatchLease {
    /// The row's id (the events' `batch_id` for a group commit's).
    pub id: Uuid,
    /// The lease's end, in microseconds; the renewer moves it on.
    pub until: AtomicI64,
    /// Deliveries of the batch still covered by it (in memory, not yet delivered or given their
    /// own row). At 0 the row is deleted.
    pub outstanding: AtomicUsize,
    /// A delivery of the batch was let go without an outcome (the database failed us): the row
    /// is no longer renewed nor deleted, so it expires and the claimer takes what is owed.
    pub abandoned: AtomicBool,
}

impl BatchLease {
    /// The lease's end.
    pub fn until(&self) -> Micros {
        Micros(self.until.load(Ordering::Relaxed))
    }
}

/// What a delivery in memory is held under.
#[derive(Debug, Clone)]
pub enum Lease {
    /// Its batch's row (a group commit's, or a claim's that names it): it has no `deliveries`
    /// row (it is at its first attempt).
    Batch(Arc<BatchLease>),
    /// Its own `deliveries` row, whose `next_attempt_at` is this node's lease end.
    Row {
        /// The `next_attempt_at` this node wrote; changes are conditional on it.
        held: Micros,
    },
}

impl Lease {
    /// Let the delivery go without an outcome (the database failed us): a batch row is no
    /// longer renewed nor deleted, so it expires and the claimer takes what is owed; a row of
    /// its own is left to its lease.
    pub fn abandon(&self) {
        if let Lease::Batch(b) = self {
            b.abandoned.store(true, Ordering::Release);
        }
    }

    /// When the lease ends.
    pub fn until(&self) -> Micros {
        match self {
            Lease::Batch(b) => b.until(),
            Lease::Row { held } => *held,
        }
    }
}

/// One (event, endpoint) delivery held in memory.
#[derive(Debug, Clone)]
pub struct Job {
    /// The event.
    pub event: EventId,
    /// Its organization.
    pub org: OrgId,
    /// The endpoint.
    pub endpoint: Uuid,
    /// The event's type.
    pub event_type: Box<str>,
    /// Its payload, as received (shared by the event's deliveries).
    pub payload: Bytes,
    /// When it was accepted.
    pub created_at: Micros,
    /// The W3C `traceparent` the event came with, sent with each attempt.
    pub traceparent: Option<Box<str>>,
    /// Attempts made to this endpoint so far, every round.
    pub attempts: u32,
    /// Attempts made when the current round began (a redelivery or recovery starts a round).
    pub retry_base: u32,
    /// What it is held under.
    pub lease: Lease,
    /// When to attempt.
    pub due: Micros,
    /// It waited in memory (for its retry's time, a circuit, a rate limit) since it last
    /// looked whether it is still owed: an ack tells no node, so it looks before it goes on.
    pub waited: bool,
    /// It waits for a turn of its endpoint's rate limit reserved for it (in this book of the
    /// bucket's): it goes then without taking another, or gives it back if it does not go.
    pub reserved: Option<u64>,
    /// The endpoint's change count ([`super::runtime::EndpointRuntime::changes`]) when the job
    /// last began to look at the endpoint: a change since (whose word came during the look)
    /// makes it look again rather than wait on what it saw.
    pub looked: u64,
}

impl Job {
    /// A job with a payload, for unit tests.
    #[cfg(test)]
    pub fn test(event: EventId, org: OrgId, payload: &str) -> Job {
        Job {
            event,
            org,
            endpoint: Uuid::nil(),
            event_type: "t".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            created_at: Micros(1_000_000),
            traceparent: None,
            attempts: 0,
            retry_base: 0,
            lease: Lease::Row { held: Micros(0) },
            due: Micros(0),
            waited: false,
            reserved: None,
            looked: 0,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx.
    Delivered,
    /// 410 Gone: the receiver asks us to stop; the endpoint is disabled.
    Gone,
    /// Anything else; `retry_after` when the receiver said when to come back.
    Failed {
        /// The receiver's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Not sent: the server's trouble (see [`super::client::NoAnswer::Unsent`]). Not an attempt
    /// while the endpoint's patience lasts (see [`super::runtime::UnsentSpell`]); a
    /// failed one after that.
    Unsent,
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
    /// The first bytes of the receiver's answer (UTF-8, lossy), if it sent any.
    pub response_body: Option<String>,
    /// The outcome.
    pub verdict: Verdict,
}

/// What a delivery is held under, as the recorder checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Its batch's row (it has no row of its own).
    Batch(Uuid),
    /// Its own row, whose `next_attempt_at` this node wrote.
    Row(Micros),
}

/// What becomes of the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Delivered then.
    Delivered(Micros),
    /// Pending; this node retries it and holds it until `held`.
    Retry {
        /// The lease's end (the retry's due time plus a lease).
        held: Micros,
    },
    /// Its round is over: failed, for the inbox, `recover` and redelivery.
    Failed {
        /// When.
        at: Micros,
        /// The last attempt's error, for the operational event.
        reason: String,
    },
    /// Pending, parked: nothing is sent until its endpoint is resumed (or, for an acknowledged
    /// event, until it is redelivered).
    Parked,
    /// Pending, not attempted: its endpoint was not active (paused, disabled, deleted) when this
    /// node looked. Parked, unless the endpoint is active again by the time the outcome is
    /// written (a resume since, on any node): then due at once, as the resume made the rest.
    Inactive,
    /// Pending, handed back to the database, due then for any node.
    Due(Micros),
    /// Pending, handed back to the database to wait for its endpoint's open circuit: due when
    /// the circuit was to close, or at once when the endpoint as stored is newer than the
    /// version this node went by (`Outcome::seen`): a resume on any node, not heard of here
    /// yet, started the circuit afresh.
    AfterCircuit {
        /// When the circuit was to close.
        until: Micros,
    },
}

/// An endpoint's health to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthWrite {
    /// The endpoint.
    pub endpoint: Uuid,
    /// Failed attempts since the last success.
    pub failures: i32,
    /// Since when every attempt has failed.
    pub failing_since: Option<Micros>,
    /// A success to record.
    pub success_at: Option<Micros>,
    /// A failure to record.
    pub failure_at: Option<Micros>,
    /// Until when its circuit is open.
    pub open_until: Option<Micros>,
}

/// An outcome's request to disable its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disable {
    /// Why, as the endpoint and the `endpoint.disabled` event will say.
    pub reason: String,
    /// Unless any node recorded a success to the endpoint after this time (`None`: whatever
    /// happened): one node's long failing spell does not disable an endpoint that other nodes
    /// reach. Successes are recorded at least every `HEALTH_SUCCESS_WRITE_EVERY`.
    pub unless_delivered_after: Option<Micros>,
}

/// One outcome for the recorder.
pub struct Outcome {
    /// The event.
    pub event: EventId,
    /// The endpoint.
    pub endpoint: Uuid,
    /// The organization.
    pub org: OrgId,
    /// Whether the event is an operational one (no operational event is made about it).
    pub operational: bool,
    /// What it is held under.
    pub held: Held,
    /// The attempt made, numbered.
    pub attempt: Option<(u32, Attempt)>,
    /// What becomes of it.
    pub next: Next,
    /// Its endpoint's health, when it changed.
    pub health: Option<HealthWrite>,
    /// Disable its endpoint.
    pub disable: Option<Disable>,
    /// The version of the endpoint (its `updated_at`) that this node's circuit breaker went by:
    /// the breaker's state in `health`, a `disable` and an `AfterCircuit` apply only while the
    /// endpoint as stored is no newer (a resume on any node starts the circuit afresh).
    pub seen: Micros,
    /// What follows once it is written.
    pub then: Then,
}

/// What follows an outcome's write.
pub enum Then {
    /// The job goes on (a retry it keeps under its own row): it waits for the answer.
    Answer(oneshot::Sender<Recorded>),
    /// The job is over: it ends when it hands the outcome over, and the recorder lets go of
    /// what the delivery holds in memory once the outcome is written (or failed).
    LetGo(Release),
}

/// What a delivery holds in memory until its outcome is written.
pub struct Release {
    /// Its lease: a batch's cover, or its entry among the rows held.
    pub lease: Lease,
    /// Its endpoint's place.
    pub runtime: Arc<EndpointRuntime>,
    /// Its payload's bytes, counted against the memory bound.
    pub bytes: usize,
}

/// What became of an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Written: this node held the delivery. `parked`: its row is parked (an ack or a pause came
    /// meanwhile), so it stops.
    Owned {
        /// Whether the row is parked.
        parked: bool,
    },
    /// Not this node's any more (taken over, redelivered, acknowledged): nothing was written.
    Lost,
    /// The database failed us: nothing was written, and whether the delivery is still this
    /// node's is unknown. It is let go: its lease runs out and any node takes it over.
    Failed,
}

/// Whether a delivery that waited in memory is still owed, as the database says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// Still owed and this node's: it may go.
    Yes,
    /// Parked meanwhile (an ack; a pause this node had not heard of): nothing is sent.
    Parked,
    /// Under another lease or time, or gone: not this node's any more.
    Gone,
}

/// A look asked for by a delivery that waited: which one, what it is held under, and where the
/// answer goes.
#[derive(Debug)]
pub struct Look {
    /// The event.
    pub event: EventId,
    /// Its organization.
    pub org: OrgId,
    /// The endpoint.
    pub endpoint: Uuid,
    /// Under its own row's lease: the lease the row must still hold. `None`: under a batch's.
    pub held: Option<Micros>,
    /// The answer.
    pub answer: oneshot::Sender<Owed>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(previous_until: Option<Micros>) -> Endpoint {
        Endpoint {
            id: Uuid::nil(),
            org: OrgId(Uuid::nil()),
            url: "http://x".into(),
            target: None,
            patterns: Some(vec!["order.*".into()]),
            status: EndpointStatus::Active,
            keys: vec![SigningKey::new(&[1]), SigningKey::new(&[2])],
            previous_until,
            rate_limit: None,
            updated_at: Micros(0),
            consecutive_failures: 0,
            failing_since: None,
            circuit_open_until: None,
            loaded_at: 0,
        }
    }

    #[test]
    fn the_previous_key_signs_only_during_the_grace_period() {
        let now = Micros(1_000);
        assert_eq!(endpoint(Some(Micros(2_000))).signing_keys(now).len(), 2);
        assert_eq!(endpoint(Some(Micros(1_000))).signing_keys(now).len(), 1);
        assert_eq!(endpoint(None).signing_keys(now).len(), 1);
    }

    #[test]
    fn patterns_decide_what_an_endpoint_takes() {
        let e = endpoint(None);
        assert!(e.takes("order.paid"));
        assert!(!e.takes("user.created"));
    }
}
