//! The messages that cross between stages, and the sinks that connect the stages.
//!
//! The runtime flow is ingress → shard (the organization's owner core) → store (group commit) →
//! delivery. Every stage imports this module and none imports a later one: a later stage is handed
//! to an earlier one by [`crate::server`] as a bounded channel ([`sink::StoreQueues`]) or a trait
//! object ([`sink::CoreLink`], [`sink::DeliverySink`]). Nothing here knows HTTP: the store answers
//! with the values in [`answer`] and [`event`], and ingress renders them.
//!
//! - `event`: an event on its way in ([`event::NewEvent`]), its status, and how an ingest ended.
//! - `job`: the work the store pool takes: event writes and everything else a request waits for.
//! - `answer`: what the store answers, as values; where an answer goes ([`answer::ReplyTo`]).
//! - `sink`: the store's queues and health flag, and the traits the server wires.

pub mod answer;
pub mod event;
pub mod job;
pub mod sink;

/// The NOTIFY channel that tells every node an organization's key or webhook changed.
pub const ORG_CHANGED_CHANNEL: &str = "triggers_org_changed";
