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

use crate::ids::OrgId;

/// The NOTIFY channel that tells every node an organization's key or webhook changed.
pub const ORG_CHANGED_CHANNEL: &str = "triggers_org_changed";

/// What changed in an organization, as a NOTIFY on [`ORG_CHANGED_CHANNEL`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Anything: its keys (what every core and the key verifier cache), its endpoints.
    Any,
    /// Only its endpoints (the delivery pool's cache). Its keys stay cached: before, every
    /// endpoint change made each core verify the organization's key again, and a tenant changing
    /// endpoints while sending events had requests refused 503 (their verification kept racing
    /// with the changes).
    Endpoints,
}

impl Change {
    /// The NOTIFY's payload: the organization's id, hyphenated for [`Change::Any`] and braced
    /// (`{…}`) for [`Change::Endpoints`]. A node that predates the distinction parses either as
    /// the id and drops all it caches of the organization, as it always did.
    pub fn payload(self, org: OrgId) -> String {
        match self {
            Change::Any => org.to_string(),
            Change::Endpoints => format!("{{{org}}}"),
        }
    }

    /// The organization and the change a payload names.
    pub fn heard(payload: &str) -> Option<(OrgId, Change)> {
        let change = match payload.starts_with('{') {
            true => Change::Endpoints,
            false => Change::Any,
        };
        let id = payload.parse::<uuid::Uuid>().ok()?;
        Some((OrgId(id), change))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payloads of both kinds, and what a node older than the distinction hears (an
    /// endpoint change as any change, as it always did).
    #[test]
    fn a_change_is_heard_as_it_was_told() {
        let org = OrgId(uuid::Uuid::from_u128(
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        ));
        for change in [Change::Any, Change::Endpoints] {
            assert_eq!(Change::heard(&change.payload(org)), Some((org, change)));
        }
        assert_eq!(Change::Any.payload(org), org.to_string());
        let older = Change::Endpoints.payload(org).parse::<uuid::Uuid>();
        assert_eq!(older.ok(), Some(org.0));
        for bad in ["", "{", "{}", "x", "heartbeat 1", "{0123}"] {
            assert_eq!(Change::heard(bad), None, "{bad:?}");
        }
    }
}
