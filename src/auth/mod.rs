//! API keys: their format, each core's cache of verified keys, and verification.
//!
//! - `key`: the 64-character key format, tiers, and [`OrgInfo`] (what a verified key tells a core).
//! - `cache`: a core's verified keys, invalidated by organization.
//! - `flight`: one verification per key at a time (per core and per node).
//! - `verify`: Argon2id off the ingress cores (verification and key creation in separate slots),
//!   the node's verified keys.
//! - `throttle`: failed keys per client address, key generations and rotations per address and
//!   per node; bounded memory, IPv6 by /64.

pub mod cache;
pub mod flight;
pub mod key;
pub mod throttle;
pub mod verify;

pub use cache::{Cached, Changes, KeyCache, KeyHash};
pub use key::{key_from_headers, keys_disagree, ApiKey, OrgInfo, Tier};
pub use verify::AuthFailure;
