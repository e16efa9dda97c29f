//! The delivery pool: every committed event is POSTed to each endpoint of its organization that
//! takes its type, with retries, on tokio tasks beside the store pool. It owns its connections
//! and its SQL; the store reaches it only through the [`crate::flow::sink::DeliverySink`] the
//! server wires.
//!
//! - Plan: before a group commit is written, the writer asks for a plan: each event's matching
//!   endpoints (decided then, once, and stored with the event) and, per delivery, whether this
//!   node holds it in memory, leaves it due in the database, or parks it (paused endpoint).
//! - Leases: the deliveries a node holds from one commit are leased by one `delivery_batches`
//!   row, renewed while they are in memory; a delivery that needs state of its own (a failed
//!   attempt, a wait, a redelivery) gets a `deliveries` row whose `next_attempt_at` is when it is
//!   due or, while a node holds it, that node's lease (kept in `lease_until` too, which a pause
//!   leaves alone, so a resume gives it back to its holder). Any node takes over expired batches and
//!   claims due rows with `FOR UPDATE SKIP LOCKED` (`claim`; a claimed row with no attempt yet
//!   is leased by a batch row too); every outcome is written only if the lease is still the
//!   node's (`record`). Two nodes never own one delivery at once.
//! - Cost: a delivery that succeeds at its first attempt writes one attempt-log row, nothing
//!   else; an event's status is derived from its deliveries when it is read.
//! - Isolation: an attempt takes its endpoint's slot (`delivery_endpoint_concurrency`) before a
//!   global one (`delivery_concurrency`), after its endpoint's circuit breaker and rate limit let
//!   it; deliveries in memory are bounded per endpoint and in all. A slow, failing, paused or
//!   rate-limited endpoint holds only its own share.
//!
//! Files: `pool` (start, the sink, finish), `shared` (the state the tasks share, the endpoints
//! cache), `runtime` (per endpoint: slots, circuit breaker, token bucket), `budget` (the token
//! buckets shared by the cluster), `job` (one delivery's
//! life in memory), `owed` (whether a delivery that waited is still owed), `worker` (one HTTP
//! attempt), `record` (outcomes written in batches, health, operational events), `claim`
//! (take-over, claims, renewal, the hand-back), `model` (the values), `schedule` (retry delays,
//! Retry-After), `sign` (Standard Webhooks), `client` (HTTP/1.1 connections per origin, written to
//! and read by the attempts' own tasks; the answer reader), `connector` (the SSRF-checking
//! connector under it).

mod budget;
pub mod claim;
pub mod client;
pub mod connector;
mod job;
pub mod model;
mod owed;
pub mod pool;
mod record;
pub mod runtime;
pub mod schedule;
mod shared;
pub mod sign;
pub mod worker;
