//! The delivery pool: every committed event of an organization with a webhook is POSTed to it, with
//! retries, on tokio tasks beside the store pool. It owns its connections and its SQL; the store
//! reaches it only through the [`crate::flow::sink::DeliverySink`] the server wires.
//!
//! - Hand-off: before a write the group-commit writer asks for a plan per event; an event with an
//!   in-memory slot is written already leased to this node and published to the pool after COMMIT
//!   (no polling on the hot path); one without waits in the database, due, for the claimer.
//! - Leases: an event's `next_attempt_at` is when a delivery is due or, while a node holds it, the
//!   end of that node's lease. Any node claims due rows with `FOR UPDATE SKIP LOCKED`
//!   (`claim`), so a crashed node's work is taken over after its lease and two nodes never own one
//!   delivery at once. Every state change is conditional on the lease still being held.
//! - Isolation: an attempt takes its organization's slot (`delivery_org_concurrency`) before a
//!   global one (`delivery_concurrency`), so a slow receiver holds only its organization's share.
//!   Events in memory are bounded per organization and in all; beyond that, due work waits in
//!   the database.
//!
//! Files: `pool` (start, the sink, finish), `shared` (the state the tasks share), `job` (one
//! event's life in memory), `worker` (one HTTP attempt), `record` (outcomes written in batches),
//! `claim` (claims, the hand-back at shutdown), `targets` (webhook cache, 410 removal), `model`
//! (the values), `schedule` (retry delays, Retry-After), `sign` (Standard Webhooks), `connector`
//! (the SSRF-checking connector under the HTTP client).

mod claim;
pub mod connector;
mod job;
pub mod model;
pub mod pool;
mod record;
pub mod schedule;
mod shared;
pub mod sign;
mod targets;
pub mod worker;
